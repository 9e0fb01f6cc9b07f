from lab.lab import main

main(prog_name="python -m lab")
