"""Photos to a prepared training set: cropping around the face, captions, masks, the quality report."""
