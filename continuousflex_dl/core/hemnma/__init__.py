"""HEMNMA: elastic and rigid alignment of particles with normal modes, its image model, and
alignment jobs split into chunks."""
