"""Training and inference of the DeepHEMNMA regressor.

* :mod:`.config`: the :class:`TrainConfig`, in sections (model, preprocessing, optimiser,
  data source; fitted values apart), saved beside the weights;
* :mod:`.model_folder`: the model folder's files (the one owner of their names), checkpoint
  I/O and :func:`load_model`, which rebuilds a network from the folder's files alone;
* :mod:`.sources`: the training-data sources (particles, simulated stream, simulated then
  fine-tuned), one module each behind one interface, and their registry;
* :mod:`.trainer`: one phase's network, optimizer and schedule (train_batch, train_epoch, evaluate);
* :mod:`.run`: :func:`train`, a whole run (checks, the source's plan, epochs, resume);
* :mod:`.inference`: :func:`predict` and the images of particles for a model.

Targets are standardised per output with the mean/std of the *training split* only (saved
in config.json), or of the amplitude prior when simulating. The split is by particle id:
all images of one particle (e.g. several noisy copies) are on the same side. Images with
NaN or infinite pixels and constant images are refused (``dataset.check_images``).
"""
from .config import (FITTED_FIELDS, PRIOR_CHOICES, RESUMABLE_SETTINGS, DataConfig, Fitted, ModelConfig,
                     OptimiserConfig, TrainConfig, changed_settings)
from .inference import images_for_model, predict, predict_particles
from .model_folder import (METRICS_COLUMNS, POSE_METRICS_COLUMNS, CheckpointError, LoadedModel, ModelFolder,
                           best_epoch, load_checkpoint, load_model, save_checkpoint)
from .run import split_by_particle, train
from .sources import DATA_CHOICES, SOURCES, source_of

__all__ = ["TrainConfig", "ModelConfig", "OptimiserConfig", "DataConfig", "Fitted", "LoadedModel", "ModelFolder",
           "CheckpointError", "split_by_particle", "train", "load_model", "best_epoch", "predict",
           "predict_particles", "images_for_model", "changed_settings", "save_checkpoint", "load_checkpoint",
           "METRICS_COLUMNS", "POSE_METRICS_COLUMNS", "FITTED_FIELDS", "RESUMABLE_SETTINGS", "DATA_CHOICES",
           "PRIOR_CHOICES", "SOURCES", "source_of"]
