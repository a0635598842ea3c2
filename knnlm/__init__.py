"""knnlm: train language models with kNN in mind and evaluate them as kNN-LMs.

Pipeline, in the order data flows: data → model → regularizers → train → datastore → knn / evaluate → sweep →
analysis / plots, with `cli` on top.
"""

__version__ = "0.1.0"
