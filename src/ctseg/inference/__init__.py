"""Inference on files and folders with any trained model folder: `load_models` (training run, CV fold, whole
CV run, stacked ensemble), `predict_file`, `predict_folder` (any dataset layout ctseg reads). The volume-level
computation is `ctseg.inference.predict.predict_volume`."""
from ctseg.inference.api import FileResult, PredictOptions, predict_file
from ctseg.inference.folder import FolderResult, predict_folder
from ctseg.inference.models import ModelSource, load_models, resolve_model

__all__ = ["FileResult", "FolderResult", "ModelSource", "PredictOptions", "load_models", "predict_file",
           "predict_folder", "resolve_model"]
