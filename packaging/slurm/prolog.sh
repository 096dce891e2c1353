#!/bin/sh
# Slurm Prolog (slurm.conf: Prolog=/etc/slurm/prolog.d/vetd.sh).
# Exit 1 from `vetd check` (a check failed) fails the prolog: Slurm drains the
# node and requeues the job. Exit 2 (vetd itself broken) or a timeout must not
# drain a whole cluster for vetd's own fault: logged, job allowed.
# Keep within the site's prolog budget (CSCS: 10 s).
timeout 10s /usr/bin/vetd check --profile prolog --config /etc/vetd/agent.toml --json \
    >>/var/log/vetd-prolog.log 2>&1
rc=$?
[ "$rc" -eq 1 ] && exit 1
[ "$rc" -ne 0 ] && echo "vetd prolog: vetd check exited $rc; job allowed" >>/var/log/vetd-prolog.log
exit 0
