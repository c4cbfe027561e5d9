"""The image-caption alignment model (retriever), its training, evaluation and the FAISS knowledge index."""
