"""capdemo training toolkit: corpora, embeddings, datastores and the shared training loop."""
