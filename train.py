"""`python train.py --config=configs/fashion_mnist.py --workdir=W`: the training command line of a checkout,
the same as the installed `rd-keras-train` (rd_keras/train_cli.py; `--help` lists the flags)."""

from rd_keras.train_cli import main

if __name__ == "__main__":
    main()
