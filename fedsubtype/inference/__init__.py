"""Using a trained model: predictions for new cases, attention maps on the image, model cards."""
