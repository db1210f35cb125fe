"""
@article{Hamitouche2022,
title = {DeepHEMNMA: ResNet-based hybrid analysis of continuous conformational heterogeneity in cryo-EM single particle images},
author = {Hamitouche, Ilyes and Jonic, Slavica},
journal = {Frontiers in Molecular Biosciences},
volume = {9},
pages = {965645},
year = {2022},
doi = {10.3389/fmolb.2022.965645}
}

@inproceedings{Hamitouche2021,
title = {Deep learning based hybrid method for analysis of continuous conformational variability of biomolecules in cryo-EM single particle images},
author = {Hamitouche, Ilyes and Jonic, Slavica},
booktitle = {29th European Signal Processing Conference (EUSIPCO)},
pages = {1256--1260},
year = {2021},
doi = {10.23919/EUSIPCO54536.2021.9616218}
}

@article{Jin2014,
title = {Iterative elastic 3D-to-2D alignment method using normal modes for studying structural dynamics of large macromolecular complexes},
author = {Jin, Qiyu and Sorzano, Carlos Oscar S. and de la Rosa-Trevin, Jose Miguel and Bilbao-Castro, Jose Roman and Nunez-Ramirez, Rafael and Llorca, Oscar and Tama, Florence and Jonic, Slavica},
journal = {Structure},
volume = {22},
number = {3},
pages = {496--506},
year = {2014},
doi = {10.1016/j.str.2014.01.004}
}

@article{Jonic2016,
title = {Cryo-EM map representation using Gaussian pseudoatoms and application to normal mode analysis},
author = {Jonic, Slavica and Sorzano, Carlos Oscar S.},
journal = {IEEE Journal of Selected Topics in Signal Processing},
volume = {10},
number = {1},
pages = {161--173},
year = {2016},
doi = {10.1109/JSTSP.2015.2489186}
}

@article{Atilgan2001,
title = {Anisotropy of fluctuation dynamics of proteins with an elastic network model},
author = {Atilgan, A. R. and Durell, S. R. and Jernigan, R. L. and Demirel, M. C. and Keskin, O. and Bahar, I.},
journal = {Biophysical Journal},
volume = {80},
number = {1},
pages = {505--515},
year = {2001},
doi = {10.1016/S0006-3495(01)76033-X}
}

@article{Bruschweiler1995,
title = {Collective protein dynamics and nuclear spin relaxation},
author = {Br{\"u}schweiler, Rafael},
journal = {The Journal of Chemical Physics},
volume = {102},
number = {8},
pages = {3396--3403},
year = {1995},
doi = {10.1063/1.469213}
}

@article{Rosenthal2003,
title = {Optimal determination of particle orientation, absolute hand, and contrast loss in single-particle electron cryomicroscopy},
author = {Rosenthal, Peter B. and Henderson, Richard},
journal = {Journal of Molecular Biology},
volume = {333},
number = {4},
pages = {721--745},
year = {2003},
doi = {10.1016/j.jmb.2003.07.013}
}

@article{Scheres2012,
title = {RELION: implementation of a Bayesian approach to cryo-EM structure determination},
author = {Scheres, Sjors H. W.},
journal = {Journal of Structural Biology},
volume = {180},
number = {3},
pages = {519--530},
year = {2012},
doi = {10.1016/j.jsb.2012.09.006}
}
"""
