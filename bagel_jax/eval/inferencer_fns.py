"""The evaluators' callables (``generate_fn``, ``answer_fn``, ``edit_fn``, ``future_fn``) from an ``Inferencer``;
the first three with a batched form ``fn.batch`` (``eval/batched.py``): an evaluator hands all of its inputs to one
call, which the Inferencer runs ``max_batch`` requests per compiled program. ``future_fn`` (shapes-future-frame) runs
one clip at a time through the cache-free sampler (``eval/future_frame.py``)."""

from __future__ import annotations

import jax

from bagel_jax.eval.future_frame import inferencer_future_fn

MAX_ANSWER_TOKENS = 32  # shapes-VQA answers are ~10 tokens; an untrained model never stops on its own


def inferencer_fns(inf, max_answer_tokens: int = MAX_ANSWER_TOKENS) -> dict:
    """The evaluators' callables from an ``Inferencer`` (answers capped at ``max_answer_tokens`` fed tokens; an
    image's ``seed`` is its sampling key, ``jax.random.key(seed)``)."""

    def generate_fn(prompt, seed):
        return inf.generate(prompt, rng=jax.random.key(seed))

    def answer_fn(image, question):
        return inf.answer(image, question, max_length=max_answer_tokens)

    def edit_fn(image, instruction, seed):
        return inf.edit(image, instruction, rng=jax.random.key(seed))

    generate_fn.batch = lambda prompts, seeds: inf.generate_batch(prompts, [jax.random.key(s) for s in seeds])
    answer_fn.batch = lambda images, questions: inf.answer_batch(images, questions, max_length=max_answer_tokens)
    edit_fn.batch = lambda images, instructions, seeds: inf.edit_batch(
        images, instructions, [jax.random.key(s) for s in seeds]
    )
    future_fn = inferencer_future_fn(inf)
    return {"generate_fn": generate_fn, "answer_fn": answer_fn, "edit_fn": edit_fn, "future_fn": future_fn}
