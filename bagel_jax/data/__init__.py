"""Input pipeline: TFDS builders → grain → packed ``PackedBatch`` rows (DESIGN §1, §4).

images.py (decode any bytes, resize/normalise/patchify, pure numpy + PIL) · tokenizer.py (SentencePiece |
tokenizer.json) · sample.py (segments → token layout per sample) · record_schema.py (any stored record → checked
fields, or a skip reason) · records.py (checked record → sample, per data kind) · skips.py (skip reasons, counts,
rate-limited messages) ·
pack.py (budgets, packer, row writer, grain pack dataset) · pipeline.py (config → iterator for the trainer) ·
builders/ (synthetic_shapes, t2i, vlm_sft, edit, interleaved_video, interleaved_web).
"""
