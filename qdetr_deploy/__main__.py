"""``python -m qdetr_deploy ...``: the ``qdetr-deploy`` command (what ``torchrun -m qdetr_deploy`` runs)."""

from qdetr_deploy.cli import main

if __name__ == "__main__":
    main()
