# Environment for training processes; sourced by every script in launch/ (the Python code sets none of it).
# Each value is a default: export your own before launching to override it.

# NCCL: report problems, and fail a hung collective with an error instead of waiting forever.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# NVLink SHARP (multicast) off: some shared hosts forbid it; it gains nothing for data parallelism here.
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
# Multi-node: name the network interface / InfiniBand HCAs of your cluster if NCCL picks the wrong ones, e.g.
#   export NCCL_SOCKET_IFNAME=ib0 NCCL_IB_HCA=mlx5
# CUDA's default of 8 hardware queues. Megatron's tensor parallelism needs 1; ZeRO does not, and 1 would
# queue its communication streams behind compute and lose the overlap.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-8}
# Sequences of varying length fragment the caching allocator less with expandable segments.
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
# One tokenizer thread pool per rank is plenty; CPU threads per rank (the launchers start one rank per GPU).
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export PYTHONUNBUFFERED=1
