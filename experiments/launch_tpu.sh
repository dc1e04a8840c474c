#!/usr/bin/env bash
# Start one prefjax training run on every host of a Cloud TPU VM slice.
#
# usage: experiments/launch_tpu.sh [--dry-run] [--detach] [--tpu NAME] [--zone Z] [--project P]
#                                  [--config FILE] [--workdir DIR] [-- --config.a=b ...]
#        experiments/launch_tpu.sh --setup [--dry-run] [--tpu NAME] [--zone Z] [--project P]
# Each flag falls back to an environment variable: TPU_NAME, ZONE, PROJECT (optional: gcloud's
# default project), CONFIG, WORKDIR (a gs:// path, shared by all hosts). REPO_DIR (default
# ~/prefjax) is the checkout on every host and PYTHON (default .venv/bin/python) its interpreter,
# both inserted unquoted so ~ and $HOME expand on the host. Arguments after -- go to prefjax.main.
#
# gcloud's --worker=all runs the same command on every host at once. The command passes
# --distributed to prefjax.main, which then calls prefjax.parallel.initialize_distributed() before
# any other JAX call: jax.distributed.initialize() with no arguments, which on Cloud TPU reads the
# slice's topology (coordinator = worker 0, process count and index) from the TPU VM metadata.
# Every process then sees all devices of the slice and the mesh spans them (a single-host slice
# initializes as one process, so the same command works there).
#
#   --setup    install prefjax with its `tpu` and `gcs` extras on every host instead of training:
#              jax[tpu] (jax with libtpu; a plain `pip install -e .` gives CPU jax) and gcsfs
#              (gs:// workdirs); creates the virtual environment first when PYTHON is missing
#   --dry-run  print the gcloud command instead of running it
#   --detach   run under nohup on each host (log: ~/prefjax_<hostname>.log) so the run outlives
#              the ssh session; without it the run stops when the connection drops
set -euo pipefail

dry_run=0 detach=0 setup=0
tpu=${TPU_NAME:-} zone=${ZONE:-} project=${PROJECT:-} config=${CONFIG:-} workdir=${WORKDIR:-}
repo_dir=${REPO_DIR:-'~/prefjax'} python=${PYTHON:-.venv/bin/python}
while (($#)); do
  case $1 in
    --dry-run) dry_run=1 ;;
    --detach) detach=1 ;;
    --setup) setup=1 ;;
    --tpu|--zone|--project|--config|--workdir)
      (($# >= 2)) || { echo "launch_tpu.sh: $1 needs a value" >&2; exit 2; }
      declare "${1#--}=$2"; shift ;;
    --) shift; break ;;
    *) echo "launch_tpu.sh: unknown argument $1 (prefjax.main flags go after --)" >&2; exit 2 ;;
  esac
  shift
done

missing=()
[[ -n $tpu ]] || missing+=("TPU_NAME/--tpu")
[[ -n $zone ]] || missing+=("ZONE/--zone")
if ((!setup)); then
  [[ -n $config ]] || missing+=("CONFIG/--config")
  [[ -n $workdir ]] || missing+=("WORKDIR/--workdir")
fi
if ((${#missing[@]})); then
  echo "launch_tpu.sh: missing ${missing[*]}" >&2
  exit 2
fi
if ((!setup)) && [[ $workdir != gs://* ]]; then
  # every host must see one workdir (checkpoints, metrics); a plain path is one per host unless
  # it is a shared mount
  echo "launch_tpu.sh: warning: WORKDIR=$workdir is not gs://; it must be shared by all hosts" >&2
fi

args=$(printf '%q ' "--config=$config" "--workdir=$workdir" "$@")
run="$python -m prefjax.main --distributed ${args% }"
if ((detach)); then
  run="nohup $run < /dev/null > ~/prefjax_\$(hostname).log 2>&1 &"
fi
remote="cd $repo_dir && $run"
if ((setup)); then
  # the extras pin jax[tpu] to prefjax's jax range; gcsfs serves gs:// paths
  remote="cd $repo_dir && { test -x $python || python3 -m venv ${python%/bin/python}; } && $python -m pip install -q -e '.[tpu,gcs]'"
fi

cmd=(gcloud compute tpus tpu-vm ssh "$tpu" "--zone=$zone")
[[ -z $project ]] || cmd+=("--project=$project")
cmd+=(--worker=all "--command=$remote")

if ((dry_run)); then
  # one word per argument, single-quoted where the shell would split or expand it: copy-pasteable
  out=()
  for a in "${cmd[@]}"; do
    flag=
    if [[ $a =~ ^(--[a-z-]+=)(.*)$ ]]; then flag=${BASH_REMATCH[1]} a=${BASH_REMATCH[2]}; fi
    if [[ ! $a =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then a="'${a//\'/\'\\\'\'}'"; fi
    out+=("$flag$a")
  done
  echo "${out[*]}"
else
  exec "${cmd[@]}"
fi
