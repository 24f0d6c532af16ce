#!/usr/bin/env bash
# cluster.sh: a throw-away single-node Slurm cluster for tests and trials.
#
# It runs a real slurmctld + slurmd (and munged) as root on 127.0.0.1, with every file under one
# directory, its own port pair and 4 fake GPUs, so that submitit job arrays can be tested on a
# machine without a GPU, systemd, cgroups or DNS. Several clusters (different DIRs) can coexist.
#
#   bash slurm/cluster.sh up DIR [--port P] [--auth munge|none] [--gpus N] [--cpus N] [--max-array-size N]
#   source DIR/env.sh          # SLURM_CONF + DIR/bin (sacct stand-in for submitit) first on PATH
#   bash slurm/cluster.sh status DIR
#   bash slurm/cluster.sh down DIR
#
# The facts behind the choices below (and the pitfalls cited as "pitfall N") are in the lab notes
# on Slurm 22.05 (Debian 12) that slurm/README.md refers to.
set -euo pipefail

readonly PROG=${0##*/}
readonly PACKAGES=(slurmctld slurmd slurm-client munge)
readonly SLURM_COMMANDS=(slurmctld slurmd sinfo squeue sbatch scancel scontrol)
readonly MARKER=.slurm-cluster    # marks DIR as made by this script; down/up only touch such DIRs
readonly NODE=localhost           # node name; with NodeAddr=127.0.0.1 no DNS is needed (pitfall 9)
readonly IDLE_TIMEOUT_S=30        # up: how long to wait for the node to become idle
readonly DRAIN_TIMEOUT_S=30       # down: how long to wait for cancelled jobs to leave the queue
readonly STOP_TIMEOUT_S=10        # down: how long each daemon gets between shutdown, TERM and KILL

usage() {
    cat <<EOF
usage: bash $PROG up DIR [--port P] [--auth munge|none] [--gpus N] [--cpus N] [--max-array-size N]
       bash $PROG down DIR
       bash $PROG status DIR

  up      start a single-node Slurm cluster with all its files under DIR and write DIR/env.sh
          --port P    slurmctld port P, slurmd port P+1 (default: a free even pair at random)
          --auth A    munge or none (default: munge if munged is installed, else none)
          --gpus N    fake GPUs DIR/dev/nvidia0..N-1 (default 4)
          --cpus N    CPUs the node advertises, whatever the hardware has (default 8)
          --max-array-size N  Slurm's MaxArraySize (default 1001)
  down    cancel all jobs of the cluster in DIR and stop its daemons (quiet if already stopped)
  status  print sinfo if the cluster in DIR is up; exit 0 if up, 3 if not
EOF
}

die() { echo "$PROG: error: $*" >&2; exit 1; }
say() { echo "$PROG: $*" >&2; }           # progress goes to stderr; stdout is kept for results
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# ---------------------------------------------------------------------------------------------
# Paths of one cluster. Everything lives under DIR.

set_paths() {
    local dir=$1
    # Slurm config values cannot hold whitespace, and we quote DIR into generated scripts.
    [[ $dir =~ ^[A-Za-z0-9_./+-]+$ ]] || die "DIR may only contain letters, digits and _ . / + - : '$dir'"
    DIR=$(realpath -m -- "$dir")
    CONF=$DIR/etc/slurm.conf
    CTLD_PID=$DIR/run/slurmctld.pid
    SLURMD_PID=$DIR/run/slurmd.pid
    MUNGE_DIR=$DIR/munge
    MUNGE_PID=$MUNGE_DIR/munged.pid
    MUNGE_SOCK=$MUNGE_DIR/munge.sock
}

# Client commands of this cluster. Without SLURM_CONF they try DNS SRV records and die (pitfall 1).
slurm() { SLURM_CONF=$CONF "$@"; }

# ---------------------------------------------------------------------------------------------
# Processes, only ever found through the pid files under DIR.

# True if process $1 exists and is not a zombie. kill -0 alone is not enough: our daemons are
# orphans whose exit must be reaped by pid 1, and pid 1 in these VMs (an agent, not a real init)
# reaps only every few seconds (observed), so without this check down waited 10 s per daemon.
is_alive() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat%% *} != Z ]]
}

# Prints the pid in pid file $1 if that process is alive and runs program $2. Checking the program
# guards against a stale pid file whose pid now belongs to some other process. The name is read
# from /proc/PID/comm, which is the name it was started under: the executable itself may be an
# alternatives target such as /usr/sbin/slurmctld-wlm.
live_pid() {
    local file=$1 program=$2 pid comm
    [[ -s $file ]] || return 1
    pid=$(tr -dc 0-9 <"$file")
    [[ -n $pid ]] && is_alive "$pid" || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [[ $comm == "$program" ]] || return 1
    echo "$pid"
}

# Waits up to $2 seconds for process $1 to exit; returns 1 if it is still there.
wait_gone() {
    local pid=$1 deadline=$((SECONDS + $2))
    while is_alive "$pid"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.1
    done
}

# Stops the daemon in pid file $1 (program $2): SIGTERM, then SIGKILL if it does not exit.
stop_daemon() {
    local file=$1 program=$2 pid
    if pid=$(live_pid "$file" "$program"); then
        kill -TERM "$pid" 2>/dev/null || true
        if ! wait_gone "$pid" "$STOP_TIMEOUT_S"; then
            say "$program (pid $pid) ignored SIGTERM; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            wait_gone "$pid" 5 || say "warning: $program (pid $pid) is still alive"
        fi
    fi
    rm -f -- "$file"
}

# Pids of the slurmstepd processes of this cluster. Each step listens on a unix socket in our
# SlurmdSpoolDir; /proc/net/unix maps those paths to socket inodes, /proc/PID/fd maps inodes to
# pids. So this finds exactly our steps, not those of another cluster on the same machine. (Only
# slurmstepd processes are looked at, to keep it fast; the name alone decides nothing.)
our_stepd_pids() {
    local inodes dir pid comm links
    inodes=$(awk -v spool="$DIR/spool/" 'index($8, spool) == 1 { printf "socket:[%s]\n", $7 }' /proc/net/unix)
    [[ -n $inodes ]] || return 0
    for dir in /proc/[0-9]*; do
        read -r comm 2>/dev/null <"$dir/comm" || continue
        [[ $comm == slurmstepd ]] || continue
        pid=${dir#/proc/}
        links=$(find "$dir/fd" -maxdepth 1 -lname 'socket:*' -printf '%l\n' 2>/dev/null) || true
        if grep -qxF -- "$inodes" <<<"$links"; then
            echo "$pid"
        fi
    done
}

# Prints "PID PPID" for every process, straight from /proc (slim images may lack ps).
ppid_table() {
    local stat_file stat fields
    for stat_file in /proc/[0-9]*/stat; do
        { stat=$(<"$stat_file"); } 2>/dev/null || continue    # the process may just have exited
        read -r -a fields <<<"${stat##*) }"    # after "PID (comm) ": state ppid ...
        stat_file=${stat_file#/proc/}
        echo "${stat_file%/stat} ${fields[1]}"
    done
}

# All descendants of the given pids.
descendants() {
    (($#)) || return 0
    ppid_table | awk -v roots="$*" '
        BEGIN { n = split(roots, r, " "); for (i = 1; i <= n; i++) keep[r[i]] = 1 }
        { parent[$1] = $2 }
        END {
            do { grew = 0
                 for (p in parent) if (!(p in keep) && (parent[p] in keep)) { keep[p] = 1; grew = 1 }
            } while (grew)
            for (i = 1; i <= n; i++) delete keep[r[i]]
            for (p in keep) print p
        }'
}

# SIGKILLs the given pids, if any.
kill_pids() {
    (($#)) || return 0
    kill -KILL "$@" 2>/dev/null || true
}

# Last resort for steps that survived their slurmd (pitfall 17: slurmstepd outlives slurmd), e.g.
# when slurmctld was already dead so nothing could be cancelled: kill them and their job processes.
kill_stray_steps() {
    local steps=() jobs=()
    mapfile -t steps < <(our_stepd_pids)
    ((${#steps[@]})) || return 0
    mapfile -t jobs < <(descendants "${steps[@]}")
    say "killing leftover job steps of this cluster: ${steps[*]}"
    kill_pids "${jobs[@]}" "${steps[@]}"
}

# ---------------------------------------------------------------------------------------------
# up

# Installs the Debian packages if a Slurm command is missing (needs root), else fails clearly.
ensure_packages() {
    local missing=() cmd
    for cmd in "${SLURM_COMMANDS[@]}"; do
        command -v "$cmd" >/dev/null || missing+=("$cmd")
    done
    ((${#missing[@]})) || return 0
    if ((EUID != 0)); then
        die "Slurm is not installed (missing: ${missing[*]}); as root run: apt-get install --no-install-recommends ${PACKAGES[*]}"
    fi
    command -v apt-get >/dev/null || die "Slurm is not installed and there is no apt-get; install ${PACKAGES[*]}"
    say "installing ${PACKAGES[*]} (missing: ${missing[*]})"
    local t0 policy=/usr/sbin/policy-rc.d made_policy=0
    t0=$(now)
    # Package setup would try to start munge/slurm on their default paths unless policy-rc.d
    # forbids it (the notes only saw the "forbidden" case, on an image that ships the file).
    # So forbid it for the duration of the install when the image does not already.
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && made_policy=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT    # also when interrupted
    fi
    local rc=0
    {
        apt-get update -o DPkg::Lock::Timeout=120 &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
                -o DPkg::Lock::Timeout=120 "${PACKAGES[@]}"
    } >&2 || rc=$?
    if ((made_policy)); then
        rm -f "$policy"
        trap - EXIT
    fi
    ((rc == 0)) || die "apt-get install ${PACKAGES[*]} failed (exit $rc)"
    for cmd in "${SLURM_COMMANDS[@]}"; do
        command -v "$cmd" >/dev/null || die "installed ${PACKAGES[*]} but '$cmd' is still missing"
    done
    say "installed in $(elapsed "$t0") s"
}

port_is_free() {
    local port=$1
    if command -v python3 >/dev/null; then
        # Bind on all addresses, as the daemons do, so a port used by anyone counts as taken.
        python3 - "$port" <<'EOF' 2>/dev/null
import socket, sys
s = socket.socket()
try:
    s.bind(("", int(sys.argv[1])))
except OSError:
    sys.exit(1)
EOF
    else
        # Without python: a port nobody listens on refuses the connection.
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 1; fi
    fi
}

# Prints a random even port P such that P and P+1 are both free.
pick_port_pair() {
    local try port
    for ((try = 0; try < 50; try++)); do
        port=$((20000 + 2 * (RANDOM % 20000)))    # even, 20000..59998
        if port_is_free "$port" && port_is_free $((port + 1)); then
            echo "$port"
            return 0
        fi
    done
    die "found no free even port pair on 127.0.0.1 after 50 tries; pass --port P"
}

# Fake GPUs: gres File= must be a character or block device, or slurmd rejects it and jobs get
# an empty CUDA_VISIBLE_DEVICES (pitfall 3). mknod needs root (c 195 N is the nvidia major);
# a symlink to /dev/null also passes the check. The index comes from the trailing number.
make_fake_gpus() {
    local n=$1 i dev
    rm -rf -- "${DIR:?}/dev"
    mkdir -p "$DIR/dev"
    for ((i = 0; i < n; i++)); do
        dev=$DIR/dev/nvidia$i
        mknod "$dev" c 195 "$i" 2>/dev/null || ln -s /dev/null "$dev"
    done
}

write_slurm_conf() {
    local port=$1 auth=$2 gpus=$3 cpus=$4 max_array_size=$5 auth_lines gres_line=
    if [[ $auth == munge ]]; then
        # Our own socket: there is no /run/munge here, and every munge user must name it (pitfall 4).
        auth_lines="AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCK,cred_expire=5"
    else
        auth_lines="AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=5"
    fi
    if ((gpus > 0)); then
        gres_line=" Gres=gpu:$gpus"
    fi
    cat >"$CONF" <<EOF
# Generated by slurm/cluster.sh for the throw-away cluster in $DIR. Do not edit: 'up' rewrites it.
ClusterName=vlmtest
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$port
SlurmdPort=$((port + 1))
$auth_lines
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# Silences "Configured MailProg is invalid" (pitfall 5).
MailProg=/bin/true
# No cgroups, no systemd: track processes by parentage, bind nothing (pitfall 6).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# No slurmdbd; bin/sacct answers submitit from squeue instead, which needs a large MinJobAge.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MinJobAge=3600
MpiDefault=none
SwitchType=switch/none
# Schedule every second, and with cred_expire=5 above a requeued job restarts in ~5-7 s
# instead of ~150 s (pitfall 10).
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Advertise more CPUs than the machine has without the node going "inval" (pitfall 2).
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
# SIGTERM -> SIGKILL gap for cancelled and requeued tasks.
KillWait=5
# Largest array index + 1 (Slurm's default 1001); small values test splitting a submission into arrays.
MaxArraySize=$max_array_size
GresTypes=gpu
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=8000$gres_line State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    # slurmctld and slurmd read gres.conf from the directory of slurm.conf.
    {
        echo "AutoDetect=off"
        if ((gpus == 1)); then
            echo "NodeName=$NODE Name=gpu File=$DIR/dev/nvidia0"
        elif ((gpus > 1)); then
            echo "NodeName=$NODE Name=gpu File=$DIR/dev/nvidia[0-$((gpus - 1))]"
        fi
    } >"$DIR/etc/gres.conf"
}

start_munged() {
    mkdir -p "$MUNGE_DIR"
    # munged refuses a socket directory that others cannot traverse (pitfall 4).
    chmod 711 "$MUNGE_DIR"
    local key=$MUNGE_DIR/munge.key
    if [[ ! -s $key ]]; then
        # Each cluster gets its own key rather than sharing /etc/munge/munge.key.
        if ! mungekey --create --keyfile="$key" 2>/dev/null; then
            dd if=/dev/urandom of="$key" bs=1024 count=1 status=none
        fi
        chmod 600 "$key"
    fi
    munged --force --socket="$MUNGE_SOCK" --key-file="$key" --pid-file="$MUNGE_PID" \
        --log-file="$MUNGE_DIR/munged.log" --seed-file="$MUNGE_DIR/munged.seed" \
        </dev/null >>"$DIR/log/munged.stdout" 2>&1 || fail_with_logs "munged failed to start"
    local deadline=$((SECONDS + 10))
    until [[ -S $MUNGE_SOCK ]] && live_pid "$MUNGE_PID" munged >/dev/null; do
        ((SECONDS < deadline)) || fail_with_logs "munged did not come up within 10 s"
        sleep 0.05
    done
}

# The daemons daemonize themselves and write their pid files. Their std streams are redirected so
# that a caller capturing our output (subprocess.run(capture_output=True)) is not kept waiting.
start_slurm_daemons() {
    # -i: ignore unreadable state files. Each up starts from an empty state dir anyway.
    slurmctld -i -f "$CONF" </dev/null >>"$DIR/log/slurmctld.stdout" 2>&1 ||
        fail_with_logs "slurmctld failed to start"
    slurmd -f "$CONF" -N "$NODE" </dev/null >>"$DIR/log/slurmd.stdout" 2>&1 ||
        fail_with_logs "slurmd failed to start"
}

# Prints the tail of every log, stops whatever this up already started (so that a failed up
# leaks no daemons into the next test) and fails. The logs stay in DIR/log for a closer look.
fail_with_logs() {
    local log
    for log in "$DIR"/log/slurmctld.log "$DIR"/log/slurmd.log "$DIR"/log/*.stdout "$MUNGE_DIR"/munged.log; do
        [[ -s $log ]] || continue
        echo "==> $log <==" >&2
        tail -n 15 "$log" >&2
    done
    stop_cluster >/dev/null 2>&1 || true
    die "$1 (logs above and in $DIR/log; daemons stopped)"
}

wait_until_idle() {
    local deadline=$((SECONDS + IDLE_TIMEOUT_S)) state
    while :; do
        state=$(slurm sinfo -h -o %T 2>/dev/null || true)
        [[ $state == idle ]] && return 0
        if ((SECONDS >= deadline)); then
            fail_with_logs "node not idle after ${IDLE_TIMEOUT_S} s (sinfo says '${state:-nothing}')"
        fi
        # Fail fast once a daemon has died (its pid file exists but the process is gone).
        if [[ -s $CTLD_PID ]] && ! live_pid "$CTLD_PID" slurmctld >/dev/null; then
            fail_with_logs "slurmctld exited during startup"
        fi
        if [[ -s $SLURMD_PID ]] && ! live_pid "$SLURMD_PID" slurmd >/dev/null; then
            fail_with_logs "slurmd exited during startup"
        fi
        sleep 0.1
    done
}

# submitit polls `sacct -o JobID,State,NodeList --parsable2 -j ID [-j ID...]`, but with
# accounting_storage/none the real sacct only says "accounting storage is disabled", and then
# result() hangs forever on tasks that were killed (pitfall 15). This stand-in answers that one
# call from squeue, which keeps finished jobs for MinJobAge seconds.
write_sacct_standin() {
    local sacct=$DIR/bin/sacct
    mkdir -p "$DIR/bin"
    cat >"$sacct" <<EOF
#!/usr/bin/env bash
# sacct stand-in for the test cluster in $DIR (written by slurm/cluster.sh).
# Answers only: sacct -o JobID,State,NodeList --parsable2 -j ID[,ID...] [-j ID...]
set -euo pipefail
export SLURM_CONF=$CONF
EOF
    cat >>"$sacct" <<'EOF'
die() { echo "sacct stand-in: $*" >&2; exit 2; }
ids=() format=
while (($#)); do
    case $1 in
        -o | --format) (($# >= 2)) || die "$1 needs a value"; format=$2; shift 2 ;;
        --format=*) format=${1#*=}; shift ;;
        -P | --parsable2) shift ;;
        -j | --jobs) (($# >= 2)) || die "$1 needs a value"; ids+=("$2"); shift 2 ;;
        --jobs=*) ids+=("${1#*=}"); shift ;;
        *) die "unsupported argument '$1' (only submitit's '-o JobID,State,NodeList --parsable2 -j IDS' is answered)" ;;
    esac
done
[[ ${format,,} == jobid,state,nodelist ]] ||
    die "only -o JobID,State,NodeList is supported, not '${format:-<none>}'"
((${#ids[@]})) || die "give job ids with -j"
# squeue skips unknown ids, but fails with "Invalid job id" when it knows none of them: then only
# the header is printed, as sacct does for jobs it has no record of. Other failures (controller
# down) are passed on, so that submitit keeps its last known state instead.
if rows=$(squeue --states=all -h -r -j "$(IFS=,; echo "${ids[*]}")" -o '%i|%T|%N' 2>&1); then
    echo "JobID|State|NodeList"
    if [[ -n $rows ]]; then echo "$rows"; fi
elif [[ $rows == *"Invalid job id"* ]]; then
    echo "JobID|State|NodeList"
else
    echo "sacct stand-in: squeue failed: $rows" >&2
    exit 1
fi
EOF
    chmod 755 "$sacct"
}

write_env_sh() {
    cat >"$DIR/env.sh" <<EOF
# Source this to use the test cluster in $DIR (written by slurm/cluster.sh up).
export SLURM_CONF=$CONF
# bin/ holds the sacct stand-in that submitit needs; it must come before any real sacct.
case ":\$PATH:" in
    *":$DIR/bin:"*) ;;
    *) export PATH="$DIR/bin:\$PATH" ;;
esac
EOF
}

cmd_up() {
    (($# >= 1)) || { usage >&2; exit 2; }
    set_paths "$1"
    shift
    local port='' auth='' gpus=4 cpus=8 max_array_size=1001
    while (($#)); do
        case $1 in
            --port) port=${2-}; shift 2 || die "--port needs a value" ;;
            --auth) auth=${2-}; shift 2 || die "--auth needs a value" ;;
            --gpus) gpus=${2-}; shift 2 || die "--gpus needs a value" ;;
            --cpus) cpus=${2-}; shift 2 || die "--cpus needs a value" ;;
            --max-array-size) max_array_size=${2-}; shift 2 || die "--max-array-size needs a value" ;;
            --port=* | --auth=* | --gpus=* | --cpus=* | --max-array-size=*) set -- "${1%%=*}" "${1#*=}" "${@:2}" ;;
            -h | --help) usage; exit 0 ;;
            *) die "unknown option for up: '$1' (see: bash $PROG --help)" ;;
        esac
    done
    # (Numbers without leading zeros: bash arithmetic would read 08 as bad octal.)
    [[ -z $port || ($port =~ ^[1-9][0-9]*$ && $port -ge 1024 && $port -le 65534) ]] ||
        die "--port must be a number in 1024..65534, not '$port'"
    [[ $gpus =~ ^(0|[1-9][0-9]?)$ && $gpus -le 64 ]] || die "--gpus must be a number in 0..64, not '$gpus'"
    [[ $cpus =~ ^[1-9][0-9]*$ ]] || die "--cpus must be a positive number, not '$cpus'"
    [[ $max_array_size =~ ^[1-9][0-9]*$ ]] || die "--max-array-size must be a positive number, not '$max_array_size'"
    if [[ -e $DIR && ! -e $DIR/$MARKER ]] && [[ -n $(ls -A -- "$DIR") ]]; then
        die "$DIR exists, is not empty and was not made by $PROG; give an empty or new DIR"
    fi
    if live_pid "$CTLD_PID" slurmctld >/dev/null || live_pid "$SLURMD_PID" slurmd >/dev/null ||
        live_pid "$MUNGE_PID" munged >/dev/null; then
        die "a cluster is already running in $DIR; run: bash $PROG down $DIR"
    fi

    ensure_packages
    ((EUID == 0)) || die "up must run as root (slurmd starts jobs as their users, which needs root)"
    if [[ -z $auth ]]; then
        if command -v munged >/dev/null; then auth=munge; else auth=none; fi
    fi
    case $auth in
        munge) command -v munged >/dev/null || die "--auth munge needs munged; install the munge package or use --auth none" ;;
        none) ;;
        *) die "--auth must be munge or none, not '$auth'" ;;
    esac
    if [[ -n $port ]]; then
        if ! port_is_free "$port" || ! port_is_free $((port + 1)); then
            die "port $port or $((port + 1)) is in use"
        fi
    else
        port=$(pick_port_pair)
    fi

    local t0
    t0=$(now)
    mkdir -p "$DIR"
    touch "$DIR/$MARKER"
    # A fresh cluster each time: old job state and step sockets must not come back.
    rm -rf -- "$DIR/state" "$DIR/spool" "$DIR/run"
    mkdir -p "$DIR"/{etc,state,spool,log,run,bin}
    make_fake_gpus "$gpus"
    write_slurm_conf "$port" "$auth" "$gpus" "$cpus" "$max_array_size"
    write_sacct_standin
    if [[ $auth == munge ]]; then start_munged; fi
    start_slurm_daemons
    wait_until_idle
    write_env_sh
    say "up in $(elapsed "$t0") s: ports $port/$((port + 1)), auth $auth, $gpus fake GPUs, $cpus CPUs"
    echo "cluster up in $DIR; use it with: source $DIR/env.sh"
}

# ---------------------------------------------------------------------------------------------
# down

# Ids of all jobs still pending, running or completing (array tasks included).
active_job_ids() {
    slurm squeue -h -o %A 2>/dev/null | sort -u
}

# Cancels every job and waits, bounded, until the queue is empty and the steps have exited.
# This must happen before the daemons stop, because slurmstepd outlives slurmd (pitfall 17).
cancel_all_jobs() {
    local ids=() steps=() jobs=() pid
    mapfile -t ids < <(active_job_ids)
    ((${#ids[@]})) || return 0
    # KILL first so that tasks ignoring SIGTERM (submitit's default handler) do not cost
    # KillWait; then a plain scancel moves any pending ones to CANCELLED.
    slurm scancel --full --signal=KILL "${ids[@]}" 2>/dev/null || true
    slurm scancel "${ids[@]}" 2>/dev/null || true
    # Even so, slurmstepd lets the job processes live ~5 s longer (measured: 4.7 s with
    # KillWait=5). Killing them ourselves, found as descendants of this cluster's steps,
    # empties the queue in ~0.3 s.
    mapfile -t steps < <(our_stepd_pids)
    if ((${#steps[@]})); then
        mapfile -t jobs < <(descendants "${steps[@]}")
        kill_pids "${jobs[@]}"
    fi
    local deadline=$((SECONDS + DRAIN_TIMEOUT_S))
    while [[ -n $(active_job_ids) ]]; do
        ((SECONDS < deadline)) || { say "warning: jobs still queued after ${DRAIN_TIMEOUT_S} s"; return 0; }
        sleep 0.2
    done
    # The steps themselves need a moment more to report to slurmd and exit.
    for pid in "${steps[@]}"; do
        wait_gone "$pid" $((deadline > SECONDS ? deadline - SECONDS : 0)) ||
            say "warning: slurmstepd $pid still running after ${DRAIN_TIMEOUT_S} s"
    done
}

# Stops everything of the cluster in DIR that still runs; prints a line if there was anything.
stop_cluster() {
    # Nothing of ours there: nothing to do (also covers a DIR that never existed).
    [[ -e $DIR/$MARKER ]] || return 0
    local t0 ctld slurmd_pid stopped=0
    t0=$(now)
    if ctld=$(live_pid "$CTLD_PID" slurmctld); then
        stopped=1
        cancel_all_jobs
        # Asks slurmctld to stop itself and slurmd cleanly (state saved, ports closed).
        slurm scontrol shutdown >/dev/null 2>&1 || true
        wait_gone "$ctld" "$STOP_TIMEOUT_S" || true
        if slurmd_pid=$(live_pid "$SLURMD_PID" slurmd); then
            wait_gone "$slurmd_pid" "$STOP_TIMEOUT_S" || true
        fi
    fi
    live_pid "$SLURMD_PID" slurmd >/dev/null && stopped=1
    live_pid "$MUNGE_PID" munged >/dev/null && stopped=1
    stop_daemon "$CTLD_PID" slurmctld
    stop_daemon "$SLURMD_PID" slurmd
    kill_stray_steps
    stop_daemon "$MUNGE_PID" munged
    rm -f -- "$MUNGE_SOCK" "$MUNGE_SOCK.lock"
    if ((stopped)); then
        echo "cluster in $DIR is down ($(elapsed "$t0") s)"
    fi
}

cmd_down() {
    (($# == 1)) || { usage >&2; exit 2; }
    set_paths "$1"
    stop_cluster
}

# ---------------------------------------------------------------------------------------------
# status

cmd_status() {
    (($# == 1)) || { usage >&2; exit 2; }
    set_paths "$1"
    local info pid
    if ! pid=$(live_pid "$CTLD_PID" slurmctld); then
        echo "down: $DIR"
        return 3
    fi
    if ! info=$(slurm sinfo 2>&1); then
        echo "not responding: $DIR (slurmctld pid $pid runs, sinfo fails: ${info##*$'\n'}; logs in $DIR/log)"
        return 3
    fi
    echo "up: $DIR (SLURM_CONF=$CONF)"
    echo "$info"
}

main() {
    (($#)) || { usage >&2; exit 2; }
    local cmd=$1
    shift
    case $cmd in
        up) cmd_up "$@" ;;
        down) cmd_down "$@" ;;
        status) cmd_status "$@" ;;
        -h | --help | help) usage ;;
        *) usage >&2; die "unknown command '$cmd'" ;;
    esac
}

main "$@"
