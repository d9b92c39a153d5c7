"""`python -m rd_keras.export --workdir=W ...`: see rd_keras/export/workdir_export.py."""

from rd_keras.export.workdir_export import main

if __name__ == "__main__":
    main()
