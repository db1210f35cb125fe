"""The conformational landscape: analysis against the truth, trajectories and clusters, maps, exports."""
