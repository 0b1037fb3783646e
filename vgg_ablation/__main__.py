from vgg_ablation.commands.cli import main

raise SystemExit(main())
