#!/usr/bin/env bash
# Run any training command with ckpt-uploader beside it, as a sidecar process.
#
#   RUN_DIR=out/run1 STORE=s3://my-checkpoints/exp1 examples/sidecar.sh python train.py --out out/run1
#
# The uploader watches RUN_DIR and uploads each checkpoint as soon as it is
# complete on disk (write to a temporary name, then rename). When training ends,
# SIGTERM asks the uploader to drain: it finishes every pending upload, verifies
# it, and exits 0. The script exits with training's status, or with the
# uploader's when training succeeded but an upload did not.
#
# Credentials: export the variables the store names (for s3://, AWS_ACCESS_KEY_ID
# and AWS_SECRET_ACCESS_KEY by default); they are inherited, never put on argv.
set -uo pipefail

: "${RUN_DIR:?set RUN_DIR to the directory training writes checkpoints into}"
: "${STORE:?set STORE to the store URI, e.g. s3://bucket/prefix or file:///abs/dir}"
UPLOADER="${UPLOADER:-ckpt-uploader}"
if [ "$#" -eq 0 ]; then
  echo "usage: RUN_DIR=... STORE=... $0 TRAINING-COMMAND [ARGS...]" >&2
  exit 2
fi

mkdir -p "$RUN_DIR"
status_file="$RUN_DIR/.ckpt-uploader.status.json"
rm -f "$status_file"
# shellcheck disable=SC2086  # UPLOADER_ARGS holds several flags
"$UPLOADER" watch "$RUN_DIR" --to "$STORE" --status-file "$status_file" ${UPLOADER_ARGS:-} &
uploader_pid=$!

# Start training only once the uploader runs: a wrong store or missing credentials
# fail here, in seconds, instead of after hours of training.
for _ in $(seq 1 600); do
  if ! kill -0 "$uploader_pid" 2>/dev/null; then
    wait "$uploader_pid"
    code=$?
    echo "ckpt-uploader could not start (exit $code); training not started" >&2
    exit "$code"
  fi
  grep -q '"state": "running"' "$status_file" 2>/dev/null && break
  sleep 0.1
done

"$@"
train_status=$?

# Training is over: drain the uploader and wait for it.
kill -TERM "$uploader_pid" 2>/dev/null
wait "$uploader_pid"
upload_status=$?

if [ "$train_status" -ne 0 ]; then
  exit "$train_status"
fi
if [ "$upload_status" -ne 0 ]; then
  echo "ckpt-uploader exited with $upload_status: not every checkpoint was uploaded;" \
       "run 'ckpt-uploader status $RUN_DIR' to see which" >&2
fi
exit "$upload_status"
