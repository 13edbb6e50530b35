"""accelerate launch scripts/distill.py recipe=lcm model=toy-digits train.steps=200 output_dir=runs/x"""
from fewstep.distill import main

if __name__ == "__main__":
    main()
