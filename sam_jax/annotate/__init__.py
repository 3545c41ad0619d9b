"""The data engine (SAM paper section 4) on our model.

auto.py   the fully automatic stage over a dataset: SA-1B JSON per image, every device and
          process, resumable (`sam-jax-annotate auto`)
"""
