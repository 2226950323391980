"""The shapes world: scenes, captions, renders, masks; the scene checker; the vocabulary; matching benchmarks."""
