// Command weft-controlplane runs a real Kubernetes control plane for weft's
// end-to-end harness: embedded etcd, kube-apiserver, kube-controller-manager
// and kube-scheduler, all built from the upstream Go modules (release 1.33).
//
// It is one multi-call binary. Run without a component name it is the
// supervisor: it generates a CA, serving certificate, service-account key
// and static tokens under --data-dir, starts etcd in-process, then starts
// itself three times as `kube-apiserver`, `kube-controller-manager` and
// `kube-scheduler` (separate processes, so the components' global flag and
// metrics registries never collide, and each has its own log file under
// <data-dir>/logs). When the API server is ready it writes the admin
// kubeconfig to --kubeconfig, then prints "weft-controlplane: ready".
// SIGTERM/SIGINT stop everything; children also die with the supervisor.
package main

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"flag"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"k8s.io/component-base/cli"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
)

// controllers is the controller-manager's controller set: what weft's
// scenarios rely on, nothing more (no node lifecycle, no volumes, no jobs).
var controllers = strings.Join([]string{
	"deployment-controller",
	"replicaset-controller",
	"endpoints-controller",
	"endpointslice-controller",
	"garbage-collector-controller",
	"namespace-controller",
	"serviceaccount-controller",
	"serviceaccount-token-controller",
	"root-ca-certificate-publisher-controller",
	"pod-garbage-collector-controller",
	"clusterrole-aggregation-controller",
}, ",")

func main() {
	if len(os.Args) > 1 {
		switch os.Args[1] {
		case "kube-apiserver":
			c := apiserver.NewAPIServerCommand()
			c.SetArgs(os.Args[2:])
			os.Exit(cli.Run(c))
		case "kube-controller-manager":
			c := controllermanager.NewControllerManagerCommand()
			c.SetArgs(os.Args[2:])
			os.Exit(cli.Run(c))
		case "kube-scheduler":
			c := scheduler.NewSchedulerCommand()
			c.SetArgs(os.Args[2:])
			os.Exit(cli.Run(c))
		}
	}
	if err := supervise(); err != nil {
		fmt.Fprintf(os.Stderr, "weft-controlplane: %v\n", err)
		os.Exit(1)
	}
}

type options struct {
	dataDir       string
	bindAddress   string
	advertise     string
	apiPort       int
	etcdPort      int
	serviceCIDR   string
	kubeconfigOut string
}

func supervise() error {
	var o options
	flag.StringVar(&o.dataDir, "data-dir", "", "directory for etcd data, certificates, kubeconfigs and logs (required)")
	flag.StringVar(&o.bindAddress, "bind-address", "0.0.0.0", "address kube-apiserver listens on")
	flag.StringVar(&o.advertise, "advertise-address", "", "non-loopback address published as the `kubernetes` Service endpoint (required)")
	flag.IntVar(&o.apiPort, "apiserver-port", 6443, "kube-apiserver HTTPS port")
	flag.IntVar(&o.etcdPort, "etcd-port", 2379, "etcd client port on 127.0.0.1 (peer port is this +1)")
	flag.StringVar(&o.serviceCIDR, "service-cidr", "10.96.0.0/16", "Service ClusterIP range")
	flag.StringVar(&o.kubeconfigOut, "kubeconfig", "", "where to write the admin kubeconfig (default <data-dir>/admin.kubeconfig)")
	flag.Parse()
	if o.dataDir == "" || o.advertise == "" {
		return fmt.Errorf("--data-dir and --advertise-address are required")
	}
	if o.kubeconfigOut == "" {
		o.kubeconfigOut = filepath.Join(o.dataDir, "admin.kubeconfig")
	}
	for _, d := range []string{"pki", "logs", "etcd"} {
		if err := os.MkdirAll(filepath.Join(o.dataDir, d), 0o700); err != nil {
			return err
		}
	}
	firstServiceIP, err := firstIP(o.serviceCIDR)
	if err != nil {
		return err
	}
	pki, err := writePKI(filepath.Join(o.dataDir, "pki"), []string{"127.0.0.1", o.advertise, firstServiceIP.String()})
	if err != nil {
		return fmt.Errorf("pki: %w", err)
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	etcd, err := startEtcd(o)
	if err != nil {
		return fmt.Errorf("etcd: %w", err)
	}
	defer etcd.Close()

	apiURL := fmt.Sprintf("https://127.0.0.1:%d", o.apiPort)
	kc := func(name, token string) (string, error) {
		p := filepath.Join(o.dataDir, name+".kubeconfig")
		return p, os.WriteFile(p, []byte(kubeconfig(apiURL, pki.caPEM, token)), 0o600)
	}
	cmKubeconfig, err := kc("controller-manager", pki.tokens["controller-manager"])
	if err != nil {
		return err
	}
	schedKubeconfig, err := kc("scheduler", pki.tokens["scheduler"])
	if err != nil {
		return err
	}
	if _, err := kc("node", pki.tokens["node"]); err != nil {
		return err
	}

	dir := pki.dir
	children := []*exec.Cmd{}
	defer func() {
		for _, c := range children {
			_ = c.Process.Signal(syscall.SIGTERM)
		}
		for _, c := range children {
			_ = c.Wait()
		}
	}()
	exited := make(chan string, 3)
	spawn := func(name string, args ...string) error {
		c, err := startChild(o.dataDir, name, args)
		if err != nil {
			return err
		}
		children = append(children, c)
		go func() { _ = c.Wait(); exited <- name }()
		return nil
	}

	// Audit log of every request weft's own service accounts make (the
	// operator and the injector), so tests can hold the install RBAC to
	// exactly the calls the code makes. Nothing else is logged.
	auditPolicy := filepath.Join(o.dataDir, "audit-policy.yaml")
	if err := os.WriteFile(auditPolicy, []byte(auditPolicyYAML), 0o600); err != nil {
		return err
	}
	if err := spawn("kube-apiserver",
		"--audit-policy-file="+auditPolicy,
		"--audit-log-path="+filepath.Join(o.dataDir, "logs", "audit.log"),
		"--audit-log-format=json",
		"--audit-log-mode=blocking",
		"--etcd-servers="+fmt.Sprintf("http://127.0.0.1:%d", o.etcdPort),
		"--bind-address="+o.bindAddress,
		"--secure-port="+strconv.Itoa(o.apiPort),
		"--advertise-address="+o.advertise,
		"--tls-cert-file="+filepath.Join(dir, "apiserver.crt"),
		"--tls-private-key-file="+filepath.Join(dir, "apiserver.key"),
		"--client-ca-file="+filepath.Join(dir, "ca.crt"),
		"--token-auth-file="+filepath.Join(dir, "tokens.csv"),
		"--authorization-mode=Node,RBAC",
		"--enable-admission-plugins=NodeRestriction",
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file="+filepath.Join(dir, "sa.pub"),
		"--service-account-signing-key-file="+filepath.Join(dir, "sa.key"),
		"--service-cluster-ip-range="+o.serviceCIDR,
		"--allow-privileged=true",
		"--profiling=false",
		"--v=1",
	); err != nil {
		return err
	}
	if err := waitReady(ctx, apiURL, pki, exited); err != nil {
		return err
	}
	if err := os.WriteFile(o.kubeconfigOut, []byte(kubeconfig(apiURL, pki.caPEM, pki.tokens["admin"])), 0o600); err != nil {
		return err
	}
	if err := spawn("kube-controller-manager",
		"--kubeconfig="+cmKubeconfig,
		"--use-service-account-credentials=true",
		"--service-account-private-key-file="+filepath.Join(dir, "sa.key"),
		"--root-ca-file="+filepath.Join(dir, "ca.crt"),
		"--controllers="+controllers,
		"--leader-elect=false",
		"--bind-address=127.0.0.1",
		"--secure-port=0",
		"--v=1",
	); err != nil {
		return err
	}
	if err := spawn("kube-scheduler",
		"--kubeconfig="+schedKubeconfig,
		"--leader-elect=false",
		"--bind-address=127.0.0.1",
		"--secure-port=0",
		"--v=1",
	); err != nil {
		return err
	}
	fmt.Println("weft-controlplane: ready")
	select {
	case <-ctx.Done():
		return nil
	case name := <-exited:
		return fmt.Errorf("%s exited; see %s", name, filepath.Join(o.dataDir, "logs", name+".log"))
	case err := <-etcd.Err():
		return fmt.Errorf("etcd: %w", err)
	}
}

// startChild runs this binary again as one component, its output in
// <data-dir>/logs/<name>.log; the child is killed if the supervisor dies.
func startChild(dataDir, name string, args []string) (*exec.Cmd, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	log, err := os.Create(filepath.Join(dataDir, "logs", name+".log"))
	if err != nil {
		return nil, err
	}
	c := exec.Command(self, append([]string{name}, args...)...)
	c.Stdout, c.Stderr = log, log
	c.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := c.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	return c, nil
}

func startEtcd(o options) (*embed.Etcd, error) {
	cfg := embed.NewConfig()
	cfg.Name = "weft"
	cfg.Dir = filepath.Join(o.dataDir, "etcd")
	client, _ := url.Parse(fmt.Sprintf("http://127.0.0.1:%d", o.etcdPort))
	peer, _ := url.Parse(fmt.Sprintf("http://127.0.0.1:%d", o.etcdPort+1))
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{*client}, []url.URL{*client}
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{*peer}, []url.URL{*peer}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	cfg.UnsafeNoFsync = true // test data: speed over durability
	cfg.LogLevel = "error"
	cfg.LogOutputs = []string{filepath.Join(o.dataDir, "logs", "etcd.log")}
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, err
	}
	select {
	case <-e.Server.ReadyNotify():
		return e, nil
	case <-time.After(60 * time.Second):
		e.Close()
		return nil, fmt.Errorf("not ready after 60s")
	}
}

func waitReady(ctx context.Context, apiURL string, p *pkiFiles, exited <-chan string) error {
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(p.caPEM)
	client := &http.Client{
		Timeout:   5 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}},
	}
	deadline := time.Now().Add(3 * time.Minute)
	for time.Now().Before(deadline) {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, apiURL+"/readyz", nil)
		req.Header.Set("Authorization", "Bearer "+p.tokens["admin"])
		if resp, err := client.Do(req); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case name := <-exited:
			return fmt.Errorf("%s exited before ready", name)
		case <-time.After(200 * time.Millisecond):
		}
	}
	return fmt.Errorf("kube-apiserver not ready after 3m")
}

type pkiFiles struct {
	dir    string
	caPEM  []byte
	tokens map[string]string
}

// writePKI writes the cluster CA, the API server's serving certificate, the
// service-account signing key and the static token file:
// admin (system:masters), the two controllers, and the simulated node.
func writePKI(dir string, ips []string) (*pkiFiles, error) {
	caKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, err
	}
	now := time.Now().Add(-time.Hour)
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "weft-e2e-ca"},
		NotBefore:             now,
		NotAfter:              now.Add(10 * 365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return nil, err
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return nil, err
	}
	srvKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, err
	}
	srvTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "kube-apiserver"},
		NotBefore:    now,
		NotAfter:     now.Add(10 * 365 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames: []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
			"kubernetes.default.svc.cluster.local"},
	}
	for _, s := range ips {
		if ip := net.ParseIP(s); ip != nil {
			srvTmpl.IPAddresses = append(srvTmpl.IPAddresses, ip)
		}
	}
	srvDER, err := x509.CreateCertificate(rand.Reader, srvTmpl, ca, &srvKey.PublicKey, caKey)
	if err != nil {
		return nil, err
	}
	saKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, err
	}
	saPub, err := x509.MarshalPKIXPublicKey(&saKey.PublicKey)
	if err != nil {
		return nil, err
	}
	caPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})
	p := &pkiFiles{dir: dir, caPEM: caPEM, tokens: map[string]string{}}
	var csv strings.Builder
	for _, u := range []struct{ key, user, groups string }{
		{"admin", "weft-admin", "system:masters"},
		{"controller-manager", "system:kube-controller-manager", ""},
		{"scheduler", "system:kube-scheduler", ""},
		{"node", "system:node:weft-node", "system:nodes"},
	} {
		b := make([]byte, 24)
		if _, err := rand.Read(b); err != nil {
			return nil, err
		}
		p.tokens[u.key] = hex.EncodeToString(b)
		fmt.Fprintf(&csv, "%s,%s,%s,\"%s\"\n", p.tokens[u.key], u.user, u.user, u.groups)
	}
	files := map[string][]byte{
		"ca.crt":        caPEM,
		"apiserver.crt": pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srvDER}),
		"apiserver.key": pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(srvKey)}),
		"sa.key":        pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(saKey)}),
		"sa.pub":        pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: saPub}),
		"tokens.csv":    []byte(csv.String()),
	}
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			return nil, err
		}
	}
	return p, nil
}

func kubeconfig(server string, caPEM []byte, token string) string {
	ca := base64.StdEncoding.EncodeToString(caPEM)
	return fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: weft-e2e
  cluster:
    server: %s
    certificate-authority-data: %s
users:
- name: weft-e2e
  user:
    token: %s
contexts:
- name: weft-e2e
  context:
    cluster: weft-e2e
    user: weft-e2e
current-context: weft-e2e
`, server, ca, token)
}

func firstIP(cidr string) (net.IP, error) {
	ip, _, err := net.ParseCIDR(cidr)
	if err != nil {
		return nil, fmt.Errorf("--service-cidr: %w", err)
	}
	ip = ip.To4()
	if ip == nil {
		return nil, fmt.Errorf("--service-cidr: only IPv4 is supported")
	}
	next := make(net.IP, 4)
	copy(next, ip)
	next[3]++
	return next, nil
}

// auditPolicyYAML records metadata of the requests of service accounts in
// weft-system and nothing else.
const auditPolicyYAML = `apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
- level: Metadata
  userGroups: ["system:serviceaccounts:weft-system"]
- level: None
`
