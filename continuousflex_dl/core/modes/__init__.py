"""Normal modes (ANM) of structures and maps (pseudoatoms), and particles synthesised along them."""
