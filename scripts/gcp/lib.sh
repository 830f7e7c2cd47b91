# Shared helpers for scripts/gcp/{provision,run,fetch,teardown}. Source it; do not run it.
# shellcheck shell=bash
# Variables set here are used by the scripts that source this file.
# shellcheck disable=SC2034

GCP_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$GCP_DIR/../.." && pwd)"
INFRA_DIR="${CPUFT_INFRA_DIR:-$REPO_ROOT/infra}"
# provision remembers the var file here so teardown can find it again.
VAR_FILE_RECORD="$INFRA_DIR/.cpuft-var-file"
# Where the VM's startup script leaves its ready/failed markers and, on the nodes of a multi-node job,
# node.env. Expanded by the VM's shell, not here (quote it with double quotes in remote commands), so
# that a test's stand-in VMs can each have their own.
# shellcheck disable=SC2016
VM_STATE_DIR='${CPUFT_VM_STATE_DIR:-/var/lib/cpuft}'

export CHECKPOINT_DISABLE=1
# Never let a personal ~/.terraformrc (mirrors, credentials helpers) change what runs.
export TF_CLI_CONFIG_FILE="${TF_CLI_CONFIG_FILE_OVERRIDE:-/dev/null}"
export TF_IN_AUTOMATION=1

PROG="$(basename "$0")"

die() {  # die CODE MESSAGE...
  local code="$1"; shift
  echo "$PROG: $*" >&2
  exit "$code"
}

need() {  # need COMMAND HINT
  command -v "$1" >/dev/null 2>&1 || die 2 "'$1' not found on PATH. $2"
}

tf() {
  terraform -chdir="$INFRA_DIR" "$@"
}

abspath() {
  python3 -c 'import os,sys; print(os.path.abspath(sys.argv[1]))' "$1"
}

# tf_output NAME: one output of the applied stack, as raw text ("" if absent).
tf_output() {
  tf output -raw "$1" 2>/dev/null || true
}

# tf_output_list NAME: a list output of the applied stack, one element per line.
tf_output_list() {
  tf output -json "$1" 2>/dev/null | python3 -c 'import json, sys; print("\n".join(json.load(sys.stdin)))' 2>/dev/null || true
}

# Sets VM, ZONE, PROJECT and SSH_VIA from flags already parsed into those variables, filling the
# gaps from the terraform state in infra/ (FROM_STATE=1 when it did). A stack whose VM belongs to an
# instance group (recreate_on_preemption) has no fixed VM name: the group is asked for its VM.
resolve_target() {
  FROM_STATE=0
  local group=""
  if [[ -z "${VM:-}" || -z "${ZONE:-}" || -z "${PROJECT:-}" ]]; then
    need terraform "Install Terraform >= 1.9, or pass --vm, --zone and --project."
    FROM_STATE=1
    VM="${VM:-$(tf_output vm_name)}"
    ZONE="${ZONE:-$(tf_output zone)}"
    PROJECT="${PROJECT:-$(tf_output project_id)}"
    SSH_VIA="${SSH_VIA:-$(tf_output ssh_via)}"
    [[ -z "$VM" ]] && group="$(tf_output instance_group)"
  fi
  SSH_VIA="${SSH_VIA:-iap}"
  if [[ -z "$VM" && -n "$group" ]]; then
    need_gcloud
    VM="$(gcloud compute instance-groups managed list-instances "$group" --project "$PROJECT" --zone "$ZONE" --uri 2>/dev/null | head -n 1 | sed 's|.*/||')"
    [[ -n "$VM" ]] || die 1 "instance group $group has no VM right now: it waits for Spot capacity, or it deleted itself when its queue was done (results are in the bucket)."
  fi
  [[ -n "$VM" && -n "$ZONE" && -n "$PROJECT" ]] ||
    die 2 "no VM known: run scripts/gcp/provision first, or pass --vm NAME --zone ZONE --project PROJECT."
}

# remote COMMAND: run a shell command on the VM, stdin/stdout passed through.
# CPUFT_SSH replaces the transport (tests use "bash -c" to run "remotely" on this machine); it sees
# the VM's name in CPUFT_REMOTE_VM.
remote() {
  if [[ -n "${CPUFT_SSH:-}" ]]; then
    # shellcheck disable=SC2086  # CPUFT_SSH is a command prefix such as "bash -c"
    CPUFT_REMOTE_VM="$VM" $CPUFT_SSH "$1"
    return
  fi
  local iap=()
  [[ "$SSH_VIA" == iap ]] && iap=(--tunnel-through-iap)
  gcloud compute ssh "$VM" --project "$PROJECT" --zone "$ZONE" "${iap[@]}" --quiet \
    --ssh-flag=-oServerAliveInterval=15 --ssh-flag=-oServerAliveCountMax=4 \
    --command "$1"
}

need_gcloud() {
  [[ -n "${CPUFT_SSH:-}" ]] && return
  need gcloud "Install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install) and run 'gcloud auth login'."
}

confirm() {  # confirm PROMPT EXPECTED: read one line from the terminal, succeed if it matches
  local answer
  [[ -t 0 ]] || die 2 "not asking on a non-interactive terminal; pass --yes to go ahead."
  read -r -p "$1 " answer
  [[ "$answer" == "$2" ]]
}
