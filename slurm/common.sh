# Sourced by slurm/train.sbatch and slurm/train_torchrun.sbatch: the task environment and the
# checkpoint-and-requeue protocol of `ldmscale submit` (ldmscale/launch/slurm.py), for plain sbatch.

# GPUs per node as asked for with --gpus-per-node=[type:]N (or set GPUS_PER_NODE; 0: a CPU job).
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_PER_NODE:-0}}
GPUS_PER_NODE=${GPUS_PER_NODE##*:}

# Defaults that a value already exported in the submitting shell overrides (sbatch passes it on).
if [ "$GPUS_PER_NODE" -gt 0 ]; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}      # the GPUs do the maths; CPU threads feed the data workers
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}   # a hung collective ends the job
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
else
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
  export DS_ACCELERATOR=cpu                         # no GPUs: DeepSpeed on the CPU, gloo
fi
PYTHON=${PYTHON:-python}
MAX_REQUEUES=${MAX_REQUEUES:-20}
RUN_DIR=${RUN_DIR:?set RUN_DIR to the run directory (it also holds the per-task logs)}
mkdir -p "$RUN_DIR/slurm"
# One master for all tasks: the job's first node, and a port derived from the job id (the same after a
# requeue, different for two jobs on one node), as ldmscale/distributed/env.py and submitit derive them.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
export MASTER_ADDR MASTER_PORT

# The job is submitted with `--signal=B:USR2@SECONDS`: Slurm warns this batch shell before the time
# limit (preemption sends USR2 the same way). The shell passes the warning to every task of the running
# step, whose trainers checkpoint at the next step boundary and exit 0; then it requeues the job, which
# resumes from `checkpoints/latest`. `scancel` (SIGTERM) makes the trainers checkpoint but never requeues.
LDMSCALE_WARNED=0
ldmscale_on_warning() {
  LDMSCALE_WARNED=1
  echo "$(date -Is) warning signal: asking every task to checkpoint and stop" >&2
  scancel --signal=USR2 "$SLURM_JOB_ID"             # the job steps, not this shell
}
trap ldmscale_on_warning USR2

# ldmscale_run_step COMMAND...: runs the srun step in the background (so the trap can fire), waits for
# it, and requeues the job when it stopped on the warning. Returns the step's exit status.
ldmscale_run_step() {
  "$@" &
  local pid=$! status
  while true; do
    wait "$pid"; status=$?
    # `wait` returns early (status > 128) when a trapped signal arrives; the step is still running then.
    kill -0 "$pid" 2>/dev/null || break
  done
  if [ "$LDMSCALE_WARNED" = 1 ]; then
    if [ "${SLURM_RESTART_COUNT:-0}" -lt "$MAX_REQUEUES" ]; then
      echo "$(date -Is) requeueing (restart $(( ${SLURM_RESTART_COUNT:-0} + 1 )) of at most $MAX_REQUEUES)" >&2
      scontrol requeue "$SLURM_JOB_ID"
    else
      echo "$(date -Is) not requeueing: MAX_REQUEUES=$MAX_REQUEUES reached; resubmit to go on" >&2
    fi
  fi
  return "$status"
}
