"""`python -m workers.service`: one model worker (see `workers.service.app`)."""

from workers.service.app import main

main()
