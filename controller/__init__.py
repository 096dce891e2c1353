"""vetd controller: fleet state, rules, exclusions and alerts."""
