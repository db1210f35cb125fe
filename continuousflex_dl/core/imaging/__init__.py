"""Image files and geometry: MRC and STAR files, the CTF, Euler angles, Gaussian projection,
atomic structures, image sources and preprocessing."""
