"""bibert: fully binarized BERT."""
