"""ImageBERT's region inputs without a detector: a region classifier trained on emoji, and region
features pooled from it over boxes (RoIAlign) into a `vlp.data.regions.RegionStore`."""
from vlp.regions.classifier import RegionClassifier, load_classifier, train_classifier
from vlp.regions.extract import extract_regions, extract_to_store, scene_boxes

__all__ = ["RegionClassifier", "extract_regions", "extract_to_store", "load_classifier", "scene_boxes",
           "train_classifier"]
