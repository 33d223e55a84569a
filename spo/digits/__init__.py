"""The embedded `digits` world (DESIGN §4): a small but real instance of the whole SPO problem built from
scikit-learn's handwritten digits: captions and tokenizer, base diffusion model, preference oracle,
contrastive backbone and Pick-a-Pic-format pairs. `spo.stages.prepare` assembles it.
"""
