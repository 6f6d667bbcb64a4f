"""Using a trained stage: mltl predict and mltl export."""
