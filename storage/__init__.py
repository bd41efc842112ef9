"""Storage tiers below the GPU: host slots, LZ4 chunk files, Redis; plus codecs and eviction orders."""
