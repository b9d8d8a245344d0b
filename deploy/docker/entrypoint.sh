#!/usr/bin/env bash
# kvq-entrypoint: PID 1's child in the kvq image (tini runs it). Three modes:
#
#   kvq-entrypoint run CMD...     one pod: CMD is `kvqd ...` or `mpirun -np N ... kvqd ...`
#   kvq-entrypoint leader CMD...  LeaderWorkerSet leader: writes the group's hostfile from
#                                 LWS_LEADER_ADDRESS / LWS_GROUP_SIZE, waits for every worker's sshd,
#                                 then runs CMD (an `mpirun ...` line) with --hostfile and -x added
#   kvq-entrypoint worker         LeaderWorkerSet worker: runs sshd so the leader's mpirun can start
#                                 ranks here; on SIGTERM it stays up until those ranks have exited
#
# SIGTERM (pod deletion, rollout) must reach rank 0's kvqd, which drains (health NOT_SERVING, new
# streams refused, running ones finish within --drain_grace_seconds) and then ends the job. Handing
# SIGTERM to mpirun instead would SIGTERM every rank at once and SIGKILL them after
# odls_base_sigkill_timeout, so the entrypoint finds rank 0 (OMPI_COMM_WORLD_RANK=0 in its
# environment, or kvqd itself without mpirun) and signals it alone. A second SIGTERM, or no rank 0
# in this pod yet, goes to mpirun.
set -euo pipefail

log() { echo "kvq-entrypoint: $*" >&2; }

ssh_port=${KVQ_SSH_PORT:-2222}
ssh_secret=${KVQ_SSH_SECRET_DIR:-/etc/kvq/ssh}
ssh_dir=${HOME:-/home/kvq}/.ssh

# Prints the PID of the local kvqd that is MPI rank 0 (or the only kvqd when there is no MPI).
find_rank0() {
  local p comm env
  for p in /proc/[0-9]*; do
    comm=$(cat "$p/comm" 2>/dev/null) || continue
    [ "$comm" = kvqd ] || continue
    env=$(tr '\0' '\n' <"$p/environ" 2>/dev/null) || continue
    if grep -qx 'OMPI_COMM_WORLD_RANK=0' <<<"$env" || ! grep -q '^OMPI_COMM_WORLD_RANK=' <<<"$env"; then
      echo "${p#/proc/}"
      return 0
    fi
  done
  return 1
}

child=""
terms=0
on_term() {
  terms=$((terms + 1))
  [ -n "$child" ] || exit 143
  local r0=""
  if ((terms == 1)) && r0=$(find_rank0); then
    log "SIGTERM: draining rank 0 (pid $r0)"
    kill -TERM "$r0" 2>/dev/null || true
  else
    log "SIGTERM: forwarding to pid $child"
    kill -TERM "$child" 2>/dev/null || true
  fi
}

# Runs "$@" as a child and waits for it through any number of trapped signals; exits with its code.
supervise() {
  trap on_term TERM INT
  "$@" &
  child=$!
  local rc=0
  while :; do
    rc=0
    wait "$child" || rc=$?
    kill -0 "$child" 2>/dev/null || break  # wait returned because of a signal: keep waiting
  done
  log "$1 exited with $rc"
  exit "$rc"
}

setup_ssh_client() {
  mkdir -p "$ssh_dir"
  chmod 700 "$ssh_dir"
  # Secret files are group-readable under fsGroup; ssh refuses such keys, so copy them.
  install -m 600 "$ssh_secret/id_ed25519" "$ssh_dir/id_ed25519"
  cat >"$ssh_dir/config" <<EOF
Host *
  Port $ssh_port
  IdentityFile $ssh_dir/id_ed25519
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  LogLevel ERROR
  ConnectTimeout 10
EOF
  chmod 600 "$ssh_dir/config"
}

# Hostnames of the group: the leader, then <leader-pod>-<i>.<subdomain>.<namespace> for i >= 1
# (LeaderWorkerSet names worker pods after their leader and puts all of them under one subdomain).
group_hosts() {
  local leader=$LWS_LEADER_ADDRESS size=$LWS_GROUP_SIZE i
  local pod=${leader%%.*} domain=${leader#*.}
  [ "$domain" != "$leader" ] || { log "LWS_LEADER_ADDRESS=$leader has no subdomain"; return 1; }
  for ((i = 1; i < size; i++)); do echo "$pod-$i.$domain"; done
}

wait_for_sshd() {
  local host=$1 deadline=$2
  until timeout 3 bash -c "exec 3<>/dev/tcp/$host/$ssh_port" 2>/dev/null; do
    ((SECONDS < deadline)) || { log "worker $host: no sshd on port $ssh_port"; return 1; }
    sleep 2
  done
}

mode_leader() {
  : "${LWS_LEADER_ADDRESS:?not in a LeaderWorkerSet}" "${LWS_GROUP_SIZE:?not in a LeaderWorkerSet}"
  : "${KVQ_GPUS_PER_POD:?set KVQ_GPUS_PER_POD to nvidia.com/gpu of each pod}"
  [ "${1:-}" = mpirun ] || { log "leader mode runs an mpirun command, got: $*"; exit 2; }
  shift
  setup_ssh_client
  local hostfile=$HOME/hostfile host
  echo "$(hostname) slots=$KVQ_GPUS_PER_POD" >"$hostfile"
  mapfile -t workers < <(group_hosts)
  local deadline=$((SECONDS + ${KVQ_WORKER_WAIT_SECONDS:-900}))
  for host in "${workers[@]}"; do
    wait_for_sshd "$host" "$deadline"
    echo "$host slots=$KVQ_GPUS_PER_POD" >>"$hostfile"
  done
  log "hostfile: $(tr '\n' ' ' <"$hostfile")"
  # Ranks started over ssh get a bare environment: export the settings they need by name.
  local exports=() v
  for v in $(compgen -e); do
    case $v in NCCL_* | UCX_* | CUDA_* | KVQ_* | LD_LIBRARY_PATH | PATH | OPENBLAS_*) exports+=(-x "$v") ;; esac
  done
  supervise mpirun --hostfile "$hostfile" "${exports[@]}" "$@"
}

mode_worker() {
  : "${LWS_LEADER_ADDRESS:?not in a LeaderWorkerSet}"
  mkdir -p "$ssh_dir"
  chmod 700 "$ssh_dir"
  if [ -f "$ssh_secret/authorized_keys" ]; then
    install -m 600 "$ssh_secret/authorized_keys" "$ssh_dir/authorized_keys"
  else
    install -m 600 "$ssh_secret/id_ed25519.pub" "$ssh_dir/authorized_keys"
  fi
  [ -f "$ssh_dir/host_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -f "$ssh_dir/host_ed25519"
  # Not root: no privilege separation, no PAM; the home directory is an emptyDir (mode 0777).
  cat >"$ssh_dir/sshd_config" <<EOF
Port $ssh_port
HostKey $ssh_dir/host_ed25519
AuthorizedKeysFile $ssh_dir/authorized_keys
PidFile $ssh_dir/sshd.pid
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PermitRootLogin no
AllowUsers $(id -un)
EOF
  /usr/sbin/sshd -D -e -f "$ssh_dir/sshd_config" &
  local sshd=$!
  # SIGTERM reaches every pod of the group at once; the leader's rank 0 still needs this pod's
  # ranks (they hold KV) while it drains, so keep sshd up until they are gone.
  trap 'worker_term $sshd' TERM INT
  local rc=0
  wait "$sshd" || rc=$?
  exit "$rc"
}

worker_term() {
  local sshd=$1 deadline=$((SECONDS + ${KVQ_WORKER_DRAIN_SECONDS:-90}))
  log "SIGTERM: waiting for local ranks to exit"
  while pgrep -u "$(id -u)" -x kvqd >/dev/null && ((SECONDS < deadline)); do sleep 1; done
  kill -TERM "$sshd" 2>/dev/null || true
  wait "$sshd" 2>/dev/null || true
  exit 0
}

main() {
  case "${1:-}" in
    run) shift; supervise "$@" ;;
    leader) shift; mode_leader "$@" ;;
    worker) shift; mode_worker "$@" ;;
    *)
      echo "usage: kvq-entrypoint run CMD... | leader mpirun ARGS... | worker" >&2
      exit 2
      ;;
  esac
}

# Sourcing the file (tests/deploy) defines the functions without running anything.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then main "$@"; fi
