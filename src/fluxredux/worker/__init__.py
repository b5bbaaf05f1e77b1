"""Running predictions: input image -> model -> safety check -> encoded files."""
