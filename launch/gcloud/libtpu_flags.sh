# shellcheck shell=bash
# libtpu/XLA flags per TPU generation (source it; train.sh passes them to the trainer as LIBTPU_INIT_ARGS).
#
#   libtpu_flags ACCELERATOR   sets REPLY to the flags for ACCELERATOR (e.g. v5p-128, v6e-64, v5litepod-16, v4-32);
#                              dies naming the accelerator when its generation is unknown.
#
# The flags follow the groups MaxText ships for its TPU runs; each one is explained where it is added. They tune
# scheduling only (never numerics): a run without them computes the same step, slower. --env=LIBTPU_INIT_ARGS=...
# on train.sh replaces them.

libtpu_flags() {
  local accelerator=$1 generation
  case $accelerator in
    v4-*) generation=v4 ;;
    v5p-*) generation=v5p ;;
    v5litepod-* | v5e-*) generation=v5e ;;
    v6e-*) generation=v6e ;;
    *) die "--accelerator: no libtpu flags for '$accelerator' (known: v4-*, v5p-*, v5litepod-*, v6e-*)" ;;
  esac
  local flags=(
    # FSDP: run the next layer's parameter all-gather asynchronously, overlapped with this layer's compute...
    --xla_enable_async_all_gather=true
    # ...by fusing the collective into the compute around it ("continuation fusion")...
    --xla_tpu_enable_async_collective_fusion=true
    --xla_tpu_enable_async_collective_fusion_fuse_all_gather=true
    # ...spread over several steps of that compute, not just the next op...
    --xla_tpu_enable_async_collective_fusion_multiple_steps=true
    # ...and on the TensorCore while it computes (collective and compute overlap in time).
    --xla_tpu_overlap_compute_collective_tc=true
    # Schedule for latency: move collectives (and host transfers of the offload_* remat policies) early enough
    # that their time hides behind independent compute.
    --xla_tpu_enable_latency_hiding_scheduler=true
    # Data parallelism (parallel.data, multi-slice dcn_data): optimise the gradient all-reduce over DCN and
    # pipeline all-reduces of different sizes across iterations.
    --xla_tpu_enable_data_parallel_all_reduce_opt=true
    --xla_tpu_data_parallel_opt_different_sized_ops=true
  )
  case $generation in
    v5p | v6e)
      # The gradients' all-reduce too is fused into the backward pass's compute (FSDP's reduce-scatter of the
      # previous layer's gradients overlaps the current layer's backward).
      flags+=(--xla_tpu_enable_async_collective_fusion_fuse_all_reduce=true --xla_enable_async_all_reduce=true)
      ;;
  esac
  if [[ $generation == v6e ]]; then
    # Trillium: give one op 96 MiB of scoped VMEM (MaxText's value for dense models): bigger matmul tiles and
    # fewer HBM round trips for the 3584 × 18944 MLP and the attention kernel's blocks.
    flags+=(--xla_tpu_scoped_vmem_limit_kib=98304)
  fi
  REPLY="${flags[*]}"
}
