from .cli import main

if __name__ == "__main__":  # `python -m ep_runtime`; importing the module (docs tools do) runs nothing
    raise SystemExit(main())
