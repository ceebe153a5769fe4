#!/usr/bin/env bash
# jaxclip on a Cloud TPU VM pod slice: create the slice (or reuse it), install this
# checkout on every worker, start the same training command on all of them, and
# stream worker 0's output. Run it from the repository root.
#
#   launch/tpu_pod.sh --zone=us-central2-b --accelerator=v4-32 \
#       --workdir=/mnt/shared/runs/vit-b32 -- --config.train.batch_size=4096
#
# JAX finds the other workers by itself on a TPU VM (jaxclip.distributed: mode auto).
# Stopping: Ctrl-C here stops the stream only; the run goes on (see `--stop`).
set -euo pipefail

usage() {
    cat <<'EOF'
usage: launch/tpu_pod.sh [options] [-- extra flags for python -m jaxclip.train]

  --name=NAME          TPU name                  (env TPU_NAME, default jaxclip-pod)
  --zone=ZONE          zone, required            (env TPU_ZONE)
  --project=PROJECT    GCP project               (env TPU_PROJECT, default: gcloud's)
  --accelerator=TYPE   slice type                (env TPU_ACCELERATOR, default v4-32)
  --version=VERSION    TPU VM software version   (env TPU_VERSION,
                                                  default tpu-ubuntu2204-base)
  --config=PATH[:ARG]  recipe                    (env JAXCLIP_CONFIG,
                                                  default configs/vit_b32.py)
  --workdir=DIR        checkpoints and logs, required: a path every worker shares,
                       e.g. a Filestore mount    (env JAXCLIP_WORKDIR)
  --jax=VERSION        jax[tpu] to install       (env JAX_VERSION, default 0.10.2)
  --spot               create the slice as Spot VMs (preemptible, cheaper)
  --skip-install       reuse what an earlier run installed
  --stop               stop the training processes on every worker, then exit
  --delete             delete the slice when training ends
  -h, --help           this text

A preempted or stopped run resumes when the same command is run again: every worker
gets SIGTERM, saves at the next step boundary into the shared workdir and exits 0.
EOF
}

NAME=${TPU_NAME:-jaxclip-pod}
ZONE=${TPU_ZONE:-}
PROJECT=${TPU_PROJECT:-}
ACCELERATOR=${TPU_ACCELERATOR:-v4-32}
VERSION=${TPU_VERSION:-tpu-ubuntu2204-base}
CONFIG=${JAXCLIP_CONFIG:-configs/vit_b32.py}
WORKDIR=${JAXCLIP_WORKDIR:-}
JAX_VERSION=${JAX_VERSION:-0.10.2}
SPOT=0
INSTALL=1
STOP=0
DELETE=0
EXTRA=()

while (($#)); do
    case "$1" in
        --name=*) NAME=${1#*=} ;;
        --zone=*) ZONE=${1#*=} ;;
        --project=*) PROJECT=${1#*=} ;;
        --accelerator=*) ACCELERATOR=${1#*=} ;;
        --version=*) VERSION=${1#*=} ;;
        --config=*) CONFIG=${1#*=} ;;
        --workdir=*) WORKDIR=${1#*=} ;;
        --jax=*) JAX_VERSION=${1#*=} ;;
        --spot) SPOT=1 ;;
        --skip-install) INSTALL=0 ;;
        --stop) STOP=1 ;;
        --delete) DELETE=1 ;;
        -h | --help)
            usage
            exit 0
            ;;
        --)
            shift
            EXTRA=("$@")
            break
            ;;
        *)
            echo "unknown option: $1" >&2
            usage >&2
            exit 2
            ;;
    esac
    shift
done

if [[ -z "$ZONE" ]]; then
    echo "error: --zone (or TPU_ZONE) is required" >&2
    exit 2
fi

GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
if [[ -n "$PROJECT" ]]; then
    WHERE+=(--project="$PROJECT")
fi
REMOTE_DIR=jaxclip  # under each worker's home directory
LOG=jaxclip-train.log

on_all_workers() {
    "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command="$1"
}

if ((STOP)); then
    # SIGTERM: each process saves at its next step boundary and exits 0.
    on_all_workers "pkill -TERM -f '[j]axclip.train' || true"
    exit 0
fi

if [[ -z "$WORKDIR" ]]; then
    echo "error: --workdir (or JAXCLIP_WORKDIR) is required, shared by all workers" >&2
    exit 2
fi
if [[ "$WORKDIR" == *://* ]]; then
    echo "error: --workdir=$WORKDIR: object-store URLs (gs://) are not supported yet;" \
        "use a directory every worker mounts (NFS or Filestore)" >&2
    exit 2
fi

# --- The slice: reuse it when it exists, else create it.
if "${GCLOUD[@]}" describe "$NAME" "${WHERE[@]}" --format='value(state)' \
    >/dev/null 2>&1; then
    echo "tpu_pod: reusing $NAME ($("${GCLOUD[@]}" describe "$NAME" "${WHERE[@]}" \
        --format='value(acceleratorType,state)'))"
else
    echo "tpu_pod: creating $NAME ($ACCELERATOR, $VERSION) in $ZONE"
    CREATE=(--accelerator-type="$ACCELERATOR" --version="$VERSION")
    if ((SPOT)); then
        CREATE+=(--spot)
    fi
    "${GCLOUD[@]}" create "$NAME" "${WHERE[@]}" "${CREATE[@]}"
fi

# --- This checkout on every worker, installed with jax[tpu].
if ((INSTALL)); then
    ARCHIVE=$(mktemp --suffix=.tar.gz)
    trap 'rm -f "$ARCHIVE"' EXIT
    tar czf "$ARCHIVE" --exclude=.git --exclude='*.pyc' --exclude=__pycache__ \
        jaxclip configs setup.py pyproject.toml README.md
    "${GCLOUD[@]}" scp "$ARCHIVE" "$NAME":jaxclip.tar.gz "${WHERE[@]}" --worker=all
    on_all_workers "set -e
        rm -rf ~/$REMOTE_DIR && mkdir -p ~/$REMOTE_DIR
        tar xzf ~/jaxclip.tar.gz -C ~/$REMOTE_DIR
        python3 -m venv ~/jaxclip-venv
        ~/jaxclip-venv/bin/pip install -q -U pip
        ~/jaxclip-venv/bin/pip install -q 'jax[tpu]==$JAX_VERSION' -e ~/$REMOTE_DIR"
fi

# --- The same command on every worker, in the background (it outlives this ssh).
TRAIN="\$HOME/jaxclip-venv/bin/python -m jaxclip.train --config=$(printf '%q' "$CONFIG")"
TRAIN+=" --workdir=$(printf '%q' "$WORKDIR")"
for flag in "${EXTRA[@]+"${EXTRA[@]}"}"; do
    TRAIN+=" $(printf '%q' "$flag")"
done
echo "tpu_pod: starting on every worker: $TRAIN"
on_all_workers "cd ~/$REMOTE_DIR && nohup $TRAIN > ~/$LOG 2>&1 < /dev/null &"

# --- Worker 0's log, until its process ends.
"${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker=0 --command="
    pid=\$(pgrep -f '[j]axclip.train' | head -n 1)
    if [ -n \"\$pid\" ]; then tail -n +1 -f ~/$LOG --pid=\$pid; else cat ~/$LOG; fi"

if ((DELETE)); then
    echo "tpu_pod: deleting $NAME"
    "${GCLOUD[@]}" delete "$NAME" "${WHERE[@]}" --quiet
fi
