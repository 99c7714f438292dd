"""Fleet controller: rollout plans, gates, rollout state machine, fleet store, servers."""
