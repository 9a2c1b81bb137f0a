from antinet_npu.cli import main

raise SystemExit(main())
