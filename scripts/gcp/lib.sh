# Shared helpers for scripts/gcp/{provision,run,fetch,teardown}. Source it; do not run it.
# shellcheck shell=bash
# Variables set here are used by the scripts that source this file.
# shellcheck disable=SC2034

GCP_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$GCP_DIR/../.." && pwd)"
INFRA_DIR="${CPUFT_INFRA_DIR:-$REPO_ROOT/infra}"
# provision remembers the var file here so teardown can find it again.
VAR_FILE_RECORD="$INFRA_DIR/.cpuft-var-file"
# Where the VM's startup script leaves its ready/failed markers (overridable for tests).
VM_STATE_DIR="${CPUFT_VM_STATE_DIR:-/var/lib/cpuft}"

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

# Sets VM, ZONE, PROJECT and SSH_VIA from flags already parsed into those variables, filling the
# gaps from the terraform state in infra/.
resolve_target() {
  if [[ -z "${VM:-}" || -z "${ZONE:-}" || -z "${PROJECT:-}" ]]; then
    need terraform "Install Terraform >= 1.9, or pass --vm, --zone and --project."
    VM="${VM:-$(tf_output vm_name)}"
    ZONE="${ZONE:-$(tf_output zone)}"
    PROJECT="${PROJECT:-$(tf_output project_id)}"
    SSH_VIA="${SSH_VIA:-$(tf_output ssh_via)}"
  fi
  SSH_VIA="${SSH_VIA:-iap}"
  [[ -n "$VM" && -n "$ZONE" && -n "$PROJECT" ]] ||
    die 2 "no VM known: run scripts/gcp/provision first, or pass --vm NAME --zone ZONE --project PROJECT."
}

# remote COMMAND: run a shell command on the VM, stdin/stdout passed through.
# CPUFT_SSH replaces the transport (tests use "bash -c" to run "remotely" on this machine).
remote() {
  if [[ -n "${CPUFT_SSH:-}" ]]; then
    # shellcheck disable=SC2086  # CPUFT_SSH is a command prefix such as "bash -c"
    $CPUFT_SSH "$1"
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
