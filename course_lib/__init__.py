"""course_lib: the library behind the diffusion-distillation course.

Layers (lower never imports higher):
    config, paths, processes, predictions, grids, conditioning      conventions and pure math
    steps, samplers, guidance, losses, metrics                      pure functions of callables and tensors
    models, sd, checkpoint, train                                   backbones, adapters, the one training engine
    data2d, images, classifier, teachers                            data, shipped teachers and feature networks
    distill/                                                        one module per method, with its budgets
    exercises, checks/, plotting, figures, bench/, render           notebooks, exercises, figures, benchmarks
"""
__version__ = "0.1.0"
