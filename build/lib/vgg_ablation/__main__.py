from vgg_ablation.cli import main

raise SystemExit(main())
