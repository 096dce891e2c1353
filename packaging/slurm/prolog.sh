#!/bin/sh
# Slurm Prolog (slurm.conf: Prolog=/etc/slurm/prolog.d/vetd.sh).
# Only exit 1 from `vetd check` (a check result `fail`: a node fault) fails the
# prolog: Slurm drains the node and requeues the job. Exit 2 (vetd itself
# broken, or a check that errored or timed out) and this script's own timeout
# are vetd's fault, not the node's: logged, job allowed, as the default rules
# only alert on `error`/`timeout` (check-broken). Exit codes: `vetd --help`.
# gpu_idle and gpu_health judge only the job's GPUs (SLURM_JOB_GPUS).
# Keep within the site's prolog budget (CSCS: 10 s).
timeout 10s /usr/bin/vetd check --profile prolog --config /etc/vetd/agent.toml --json \
    >>/var/log/vetd-prolog.log 2>&1
rc=$?
[ "$rc" -eq 1 ] && exit 1
[ "$rc" -ne 0 ] && echo "vetd prolog: vetd check exited $rc (vetd's own failure, not the node's); job allowed" \
    >>/var/log/vetd-prolog.log
exit 0
