"""Fine-tuning the multi-task network with fastai (extra `train`; serving never imports this).

data.py reads the training layouts, learner.py builds fastai's DataLoaders, loss, metrics and
Learner, run.py trains and exports the serving artifact (artifact.py).
"""
