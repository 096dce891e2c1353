#!/bin/sh
# Slurm Epilog (slurm.conf: Epilog=/etc/slurm/epilog.d/vetd.sh; Slurm passes no arguments, hence
# this wrapper). `vetd slurm epilog` asks this node's agent to vet it after the job (SLURM_JOB_ID,
# SLURM_JOB_GPUS) and records the job's end and exit code: exit 1 and a "vetd: node fault" line
# only on a node fault, after setting the drain reason ("vetd: epilog NODE: …"); Slurm then
# drains the node.
# Anything else leaves the node in service: vetd's own failure (no agent, its deadline, [slurm] in
# /etc/vetd/agent.toml, a check that errored) is logged (journalctl -t vetd-slurm), and so is a
# vetd that could not even start (exit 1 without the fault line: a broken install drains nothing).
vetd=${VETD_BIN:-/usr/bin/vetd}
out=$("$vetd" slurm epilog 2>&1)
rc=$?
[ -n "$out" ] && printf '%s\n' "$out" >&2   # slurmd discards it; a wrapper of the wrapper may keep it
case "$out" in
    *"vetd: node fault"*) [ "$rc" -eq 1 ] && exit 1 ;;
esac
[ "$rc" -ne 0 ] && logger -t vetd-slurm -p daemon.warning \
    "epilog job ${SLURM_JOB_ID:-?}: $vetd exited $rc without a node fault (vetd's own failure); the node stays in service: $out" \
    2>/dev/null
exit 0
