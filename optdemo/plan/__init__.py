"""Deciding before loading: where every layer goes (the planner), the notes and blockers of a plan,
the KV cache room, this machine's bandwidths, the one placement policy, and the predicted speed."""
