from omni_rt.cli import main

raise SystemExit(main())
