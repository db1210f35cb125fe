"""DeepHEMNMA: the ResNet regressor, its training (on particles or a simulated stream),
distributed training and prediction jobs."""
