"""From recorded numbers to a verdict: metrics, the noise rule and attribution, pooled embeddings."""
