"""course_lib: the library behind the diffusion-distillation course.

Layers (lower never imports higher):
    config, processes, predictions, grids          conventions and pure math
    samplers, guidance, losses, metrics            pure functions of callables and tensors
    models, checkpoint, train                      backbones, adapters, the one training loop
    data2d, images, classifier, teachers           data, shipped teachers and feature networks
    exercises, checks, plotting, bench             notebooks, exercises, figures, benchmarks
"""
__version__ = "0.1.0"
