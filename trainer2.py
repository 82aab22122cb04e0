"""Train a siamese face-verification net on MTCNN-cropped faces (cropped_dataset/): the
project's recipe (RECIPE.md). Every other hyperparameter is trainer.py's.

Edit the hyperparameters below, or override any of them: python trainer2.py --epochs=5 --lr=0.01
`python trainer2.py --help` lists every name with its value and meaning.
Multi-GPU/CPU: torchrun --nproc_per_node=2 trainer2.py. Resume: --resume=logs/<run>.
"""
from trainer import *  # noqa: F401,F403 (the defaults; below, only what differs)

data_dir = "cropped_dataset"   # <person>/<image>.jpg faces from crop_dataset_to_faces.py
image_size = 112               # input side in pixels (crops are 112 px)
augment_p = 0.8                # probability of the random crop and of the colour jitter
model = "compact"              # a small IResNet-style CNN (backbones.py)
init = "kaiming"               # init of new layers
loss = "arcface"               # additive angular margin over the training people (losses.py)
distance = "cosine"
optimizer = "sgd"              # with Nesterov momentum
lr = 0.1
weight_decay = 5e-4
epochs = 200                   # the max_minutes budget ends it first
batch_size = 128
patience = 30                  # evaluations without improvement before stopping

if __name__ == "__main__":
    import sys
    import training
    sys.exit(training.main(globals()))
